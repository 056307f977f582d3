"""Lightning data modules, one module per dataset family; configs name each by its module.

base.py         TaskDataModule (task check, loaders, detection collate), DiskDataModule
shapes.py       the synthetic shapes scenes (no download, no disk) and ShapesDataModule
imagefolder.py  class folders per split
cifar.py        CIFAR-10 / CIFAR-100
pet.py          Oxford-IIIT Pet (breeds, or pet / background masks)
voc.py          PASCAL VOC 2012 segmentation
coco.py         COCO 2017 detection
transforms.py   the torchvision.transforms.v2 presets per task
"""
